"""A run's page: progress, throughput, cost, failures, distributions, quality and samples.

`data.collect` reads a run folder into JSON-ready numbers; `page.render_page` turns them into
one self-contained HTML document. `cosmo report` writes it to a file; the dispatcher serves it
for the runs it drives.
"""
