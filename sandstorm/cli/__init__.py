"""The command line: ``sandstorm serve`` and the image, admin and client commands."""
