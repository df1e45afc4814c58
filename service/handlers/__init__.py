"""HTTP handlers, one module per resource; `service/routes.py` wires them."""
