"""Deployment: fold batch norm, lower to an integer graph, export it to a backend."""
