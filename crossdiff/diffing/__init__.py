"""Model diffing: which latents are base-only, shared or chat-only, how well, and the dashboard."""
