"""The config: its table and presets (schema), the command line (cli), what a config implies (plan)."""
