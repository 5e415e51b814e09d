"""The model worker: cli.py (command line), pipeline.py (the Worker's stages), model.py (the classifier)."""
