"""Interventions at the answer position: cached answer passes (answers.py), SAE feature edits
(edits.py), causal effects by attribution and ablation (effects.py), saved steerings and steered label
probabilities (steering.py), probe-direction steering (probe.py), prompt and precision changes
(perturb.py)."""
