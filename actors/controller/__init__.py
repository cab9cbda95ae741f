"""The controller: one detached actor per cluster that owns the configuration and the registry
of model instances. Nothing here imports the ingress (`serve_app`).
"""

from actors.controller.actor import CONTROLLER_NAME, Controller, create_controller, get_controller

__all__ = ["CONTROLLER_NAME", "Controller", "create_controller", "get_controller"]
