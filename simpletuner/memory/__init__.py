"""Memory: what a run needs (the planner, torch-free) and what it measured (peaks of real steps)."""
