"""chatpipe's benchmark harness: `python -m bench` (see docs/benchmarks.md).

- `bench.run`: the suite (systems, loads, the measured window);
- `bench.driver`: the load driver, run in its own process (`python -m bench.driver`);
- `bench.sse`: the driver's minimal SSE client;
- `bench.stack`: the processes (dedicated Redis, chatpipe, baselines) and CPU/RSS sampling;
- `bench.baselines`: the limit and the seed design, as small FastAPI apps;
- `bench.report`: tables, targets, capacity; `bench.profile`: py-spy summaries.
"""
