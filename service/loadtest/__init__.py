"""Load testing: `authsvc load` (one scenario) and `authsvc bench` (the benchmark suite).

Traffic goes only to the target given (default: a server this tool starts on
127.0.0.1), and every run is bounded by its duration.
"""
