"""Data screening: find poisoned and mislabelled rows before they become a model.

Heuristic detectors behind one interface (`interface.Detector`): label issues (cleanlab),
backdoor triggers (per-class robust statistics; spectral signatures and activation clustering
on a trained model's penultimate layer), duplicates and train/test leaks, class balance and
outliers. `screen.screen(dataset.load(path), policy)` is the whole screen; no detector imports
TensorFlow. This package re-exports nothing: the deploy gate needs only `attest`, and must not
pay numpy's start-up for the rest.
"""
