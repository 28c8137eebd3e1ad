"""The fa-chat command line."""
