"""Data: sources (files, folders, hub), row formats, tokenisation and collators."""
