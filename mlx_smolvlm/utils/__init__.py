"""Shared plumbing: atomic files and folders, command-line options, the distributed group."""
