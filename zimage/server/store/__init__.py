"""The job store behind `zimage.server.jobs.JobStore`: one interface, two database backends, image files anywhere.

    model.py      JobRecord, id and image-name patterns, the batch key, StoreUnavailable
    sql.py        the job state machine in SQL (shared by both backends): transitions, claims and leases, reads
    sqlite.py     SQLite (WAL, synchronous=FULL): one machine
    postgres.py   PostgreSQL (psycopg 3, a connection pool, SKIP LOCKED claims): a cluster
    files.py      image files in a directory or at any fsspec URL, written atomically; crash leftovers removed
    retention.py  what may be deleted and when (--retention), the background sweep
"""
