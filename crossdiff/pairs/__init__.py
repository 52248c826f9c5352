"""Built model pairs: the embedded toy pair (toy_pair/: its shipped weights), Gemma-3-270m offline."""
