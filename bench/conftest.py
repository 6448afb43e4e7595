from bench.machine import machine_info as facts


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastppo"] = facts()
