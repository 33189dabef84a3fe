"""Pieces every floor uses; imports nothing else of the project."""
