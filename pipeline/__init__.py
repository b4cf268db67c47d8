"""chainproof: reproducible ML pipelines whose every stage leaves a signed in-toto link."""
