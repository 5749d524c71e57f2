"""A stand-in for the Hugging Face Hub's write API on 127.0.0.1, for upload tests that never touch the
network: just the endpoints huggingface_hub's create_repo and upload_folder call (repo creation,
preupload, commit) and the model-card metadata check they make (/api/validate-yaml). Every file is
answered as a "regular" (inline, base64) upload, so no LFS or Xet
transfer is needed; committed files are kept in memory, by repo, for the test to compare."""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def card_metadata_errors(content: str) -> list[str]:
    """The model-card metadata rules the Hub enforces on the fields evomerge writes: a YAML mapping between
    `---` lines; base_model a model id or a list of them; library_name a string; tags a list of strings."""
    if not content.startswith("---\n"):
        return []  # no metadata: the Hub accepts it (with a warning)
    try:
        meta = yaml.safe_load(content[4:content.index("\n---", 3)])
    except (ValueError, yaml.YAMLError) as e:
        return [f"metadata is not valid YAML: {e}"]
    if not isinstance(meta, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    bases = meta.get("base_model", [])
    for b in [bases] if isinstance(bases, str) else bases if isinstance(bases, list) else [None]:
        if not isinstance(b, str) or not _REPO_ID.match(b):
            errors.append(f'"base_model" must be a model id (owner/name) or a list of them, got {b!r}')
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append('"library_name" must be a string')
    tags = meta.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        errors.append('"tags" must be a list of strings')
    return errors


class HubStandIn:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.requests: list[tuple[str, str]] = []
        self.validated: list[str] = []  # README.md texts sent to /api/validate-yaml
        self.headers_seen: list[dict[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(("POST", self.path))
                hub.headers_seen.append(dict(self.headers))
                path = self.path.split("?")[0]
                if path == "/api/validate-yaml":
                    content = json.loads(body)["content"]
                    hub.validated.append(content)
                    errors = [{"message": m} for m in card_metadata_errors(content)]
                    return self._reply(400 if errors else 200, {"errors": errors, "warnings": []})
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if repo_id in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo",
                                                 "url": f"http://hub/{repo_id}"})
                    private = bool(req.get("private")) or req.get("visibility") == "private"
                    hub.repos[repo_id] = {"private": private, "files": {}, "commits": []}
                    return self._reply(200, {"url": f"http://127.0.0.1/{repo_id}", "name": repo_id})
                parts = path.split("/")  # /api/models/<owner>/<name>/(preupload|commit)/<revision>
                if len(parts) >= 7 and parts[1:3] == ["api", "models"]:
                    repo_id, action = f"{parts[3]}/{parts[4]}", parts[5]
                    if repo_id not in hub.repos:
                        return self._reply(404, {"error": f"Repository {repo_id} not found"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                            "shouldIgnore": False} for f in files]})
                    if action == "commit":
                        repo = hub.repos[repo_id]
                        header = None
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "header":
                                header = item["value"]
                            elif item["key"] == "file":
                                v = item["value"]
                                repo["files"][v["path"]] = base64.b64decode(v["content"])
                        repo["commits"].append(header)
                        oid = f"{len(repo['commits']):040x}"
                        return self._reply(200, {"commitUrl": f"http://127.0.0.1/{repo_id}/commit/{oid}",
                                                 "commitOid": oid})
                self._reply(404, {"error": f"stand-in Hub does not implement POST {path}"})

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path))
                self._reply(404, {"error": f"stand-in Hub does not implement GET {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
