"""The pure core: config, decisions and text that the actors and the ingress carry out.

No module here imports ray, actors or serve_app (proxifier.cli, the command line, aside).
"""
