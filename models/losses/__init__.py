"""Loss functions by name (stable import paths; the implementations live beside the models)."""
