"""Reading a compiled model: the edge/format table, graphs, assignment profiles."""
