"""runner_executor/core"""
