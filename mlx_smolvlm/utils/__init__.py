"""Shared plumbing: atomic files and folders, command-line options."""
