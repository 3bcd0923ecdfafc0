"""`crh web`: the queue and the inversions at a glance, in a browser.

A read-only web application over the same database every command uses,
connected with the caller's own login (row-level security decides what it
shows).  The overview (jobs by state and group, the last day, workers,
failures) updates itself; a job's page shows its history and what it
computed: the RMS of each iteration, the final model over the mesh, CRMod's
readings, or why it failed.  Pictures are drawn on the server from the
stored archives, read in memory, and cached by sha256.

Modules: app (routes and the request guard), pages (what each page
shows), results (reading and drawing a job's files), archives (members of
a stored archive, in memory), formats (CRMod/CRTomo file formats),
pictures (matplotlib), cache, connections (read-only sessions of the
caller's login), templating, server (waitress).  Needs the optional extra
``cr_queue[web]``: bottle, waitress, Jinja2, matplotlib, numpy.
"""
