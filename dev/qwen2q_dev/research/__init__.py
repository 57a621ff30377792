"""Peer comparisons and their statistics (see peers/README.md for the runs and results/ for their JSON)."""
