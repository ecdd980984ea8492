"""The load-test harness behind `loramux bench load` (bench/load_bench.py).

A client of a running server over gRPC (loramux) or any OpenAI-compatible HTTP endpoint. The
pieces, each torch-free, with data moving one way:

    workload.py  the planned requests: adapter popularity (+ churn), arrival times, lengths, seed
    clients.py   one request over gRPC or HTTP, timed token by token -> RequestRecord
    runner.py    sends the plan open-loop (or closed-loop), scrapes /metrics, progress bar
    canary.py    each adapter's greedy answer before the load, checked again under load
    report.py    RequestRecords (+ scraped series) -> the JSON report
    sweep.py     rate sweep: the highest rate meeting a service-level objective
    plots.py     PNG plots of one report, of a sweep, of several runs, and `--compare A B`
    scrape.py    Prometheus text from the server's /metrics -> time series
"""
