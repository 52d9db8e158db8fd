"""``/docs``: Swagger UI served by the gateway itself, from the ``swagger-ui-bundle`` package, so the page works
where no CDN can be reached (an air-gapped cluster, a laptop offline).

That package carries Swagger UI 4, which renders OpenAPI 3.0 only; FastAPI writes 3.1. The page therefore
reads ``/docs/openapi-3.0.json``: the same document with the few 3.1 forms FastAPI uses written the 3.0 way
(``nullable``, boolean ``exclusiveMinimum``, ``example``, ``enum`` for ``const``). ``/openapi.json`` stays 3.1,
the one for clients and tools. Swagger UI's online validator badge (a request to swagger.io) is off.
"""

from __future__ import annotations

import copy
import html
from typing import Any

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"
SPEC_3_0 = "/docs/openapi-3.0.json"

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" type="text/css" href="{assets}/swagger-ui.css">
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{
  url: "{spec}",
  dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  deepLinking: true,
  persistAuthorization: true,
  validatorUrl: null,
}});
</script>
</body>
</html>
"""


def install_docs(app: FastAPI) -> None:
    """Serve ``/docs`` (the page), ``/docs/assets/*`` (Swagger UI's files) and ``/docs/openapi-3.0.json``."""
    page = _PAGE.format(title=html.escape(f"{app.title} - API docs"), assets=ASSETS, spec=SPEC_3_0)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get(SPEC_3_0, include_in_schema=False)
    async def openapi_3_0() -> JSONResponse:
        return JSONResponse(as_openapi_3_0(app.openapi()))

    app.mount(ASSETS, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger-ui")


def as_openapi_3_0(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of a FastAPI OpenAPI 3.1 document that Swagger UI 4 renders (for display, not for validation)."""
    out = _downgrade(copy.deepcopy(spec))
    out["openapi"] = "3.0.3"
    return out


def _downgrade(node: Any) -> Any:
    if isinstance(node, list):
        return [_downgrade(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _downgrade(value) for key, value in node.items()}
    for choice in ("anyOf", "oneOf"):
        options = node.get(choice)
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [option for option in options if option != {"type": "null"}]
            node.pop(choice)
            if len(rest) == 1 and isinstance(rest[0], dict):
                node = {**rest[0], **node}
            elif rest:
                node[choice] = rest
            node["nullable"] = True
    if node.get("type") == "null":  # a value that is only ever null
        node.pop("type")
        node["nullable"] = True
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = node.get(bound)
        if isinstance(value, int | float) and not isinstance(value, bool):
            node[plain], node[bound] = value, True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    examples = node.get("examples")
    if isinstance(examples, list) and "type" in node:  # JSON Schema's examples; OpenAPI 3.0 has one example
        node.pop("examples")
        if examples:
            node["example"] = examples[0]
    return node
