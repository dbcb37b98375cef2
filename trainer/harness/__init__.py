"""The harness shared by the demo, the tests and the benchmarks: find and configure ComfyUI (host), start a real
server and drive its API (comfy_server), build tiny and full-size models without downloads (tiny_models), and
the shipped workflows with the one builder of API-format graphs (workflows).
"""
