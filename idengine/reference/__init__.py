"""The engine's call: a reference index over every record of the user's reference (index.py), the evidence each
candidate species gets (evidence.py), and the decision model that turns it into calibrated probabilities for each
species, "a species not in the reference" and "a genus not in the reference" (decision.py)."""
