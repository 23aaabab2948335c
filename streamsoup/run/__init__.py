"""Running a plan: the dask graph, its executor and clients, the merge driver, progress and signals."""
