"""`kbit plan`: spend a budget of total bits where the model needs them (per-tensor k, block size and data type).

choices.py: the grid of settings a tensor may get, and the budget; sensitivity.py: the predicted loss of each
tensor under each choice; solve.py: the allocation (Lagrangian over convex hulls, then a greedy fill);
write.py: the recipe YAML and its exact size as encode writes it; figure.py: bits per layer; planner.py: all of it.
"""
