"""A loopback server that answers the Hub endpoints huggingface_hub uses to push and pull a model repository.

In memory, model repositories only, every file uploaded as a regular (non-LFS) blob. Enough for create_repo,
upload_folder / create_commit (preupload + NDJSON commit), model_info, list_repo_tree, hf_hub_download and
snapshot_download, so that push_to_hub and from_pretrained("org/name") run over real HTTP in the tests.
Point ``HF_ENDPOINT`` at ``server.url`` before huggingface_hub is imported (e.g. in a child process).

    with LoopbackHub() as hub:
        subprocess.run([...], env={..., "HF_ENDPOINT": hub.url})
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        self.commits: list[tuple[str, dict[str, bytes]]] = []  # (sha, files), oldest first
        self.created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    def files(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if not self.commits:
            return ("0" * 40, {}) if revision == "main" else None
        if revision == "main":
            return self.commits[-1]
        for sha, files in self.commits:
            if sha == revision:
                return sha, files
        return None

    def commit(self, message: str, added: dict[str, bytes], deleted: set[str]) -> str:
        files = dict(self.commits[-1][1]) if self.commits else {}
        for path in deleted:
            files = {p: v for p, v in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        files.update(added)
        digest = hashlib.sha1(message.encode() + str(len(self.commits)).encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_sha(files[path]).encode())
        sha = digest.hexdigest()
        self.commits.append((sha, files))
        return sha


class LoopbackHub:
    """Start with ``start()`` (or a ``with`` block); ``url`` is the endpoint; ``repos`` holds what was pushed;
    ``requests`` logs ``(method, path)`` of every request."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.validated_cards: list[dict | None] = []  # metadata of every README.md validated before an upload
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                hub.handle(self, "GET")

            def do_HEAD(self):
                hub.handle(self, "HEAD")

            def do_POST(self):
                hub.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> LoopbackHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- responses ------------------------------------------------------------------------------------------
    @staticmethod
    def send(handler, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None,
             method: str = "GET") -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        handler.send_response(status)
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(body)

    def not_found(self, handler, code: str, method: str) -> None:
        self.send(handler, 404, {"error": code}, {"X-Error-Code": code, "X-Error-Message": code}, method)

    def handle(self, handler, method: str) -> None:
        url = urlparse(handler.path)
        path, query = unquote(url.path), parse_qs(url.query)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self.lock:
            self.requests.append((method, path))
            try:
                self.route(handler, method, path, query, body)
            except Exception as e:  # a bug in the fake must show up as a failure, not a hang
                self.send(handler, 500, {"error": repr(e)}, method=method)

    def route(self, handler, method, path, query, body) -> None:
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body or b"{}")
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if "/" not in repo_id:
                repo_id = f"user/{repo_id}"
            if repo_id in self.repos:
                return self.send(handler, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
            self.repos[repo_id] = Repo(repo_id)
            return self.send(handler, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":  # the README.md metadata block of an upload
            content = json.loads(body)["content"]
            m = re.match(r"^---\n(.*?)\n---", content, re.DOTALL)
            try:
                meta = yaml.safe_load(m.group(1)) if m else None
                if m and not isinstance(meta, dict):
                    raise ValueError("metadata is not a mapping")
            except Exception as e:
                return self.send(handler, 400, {"errors": [{"message": str(e)}]})
            self.validated_cards.append(meta)
            return self.send(handler, 200, {"warnings": [] if meta else [{"message": "empty metadata"}]})
        if method == "GET" and path == "/api/whoami-v2":
            return self.send(handler, 200, {"type": "user", "name": "user", "auth": {"accessToken": {"role": "write"}}})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(preupload|commit|revision|tree|paths-info)/([^/]+)(/.*)?)?", path)
        if m:
            return self.api(handler, method, m.group(1), m.group(2), m.group(3), (m.group(4) or "").lstrip("/"), query, body)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            return self.resolve(handler, method, *m.groups())
        return self.send(handler, 404, {"error": f"no route for {method} {path}"}, method=method)

    def api(self, handler, method, repo_id, action, revision, subpath, query, body) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self.not_found(handler, "RepoNotFound", method)
        snapshot = repo.files(revision or "main")
        if snapshot is None:
            return self.not_found(handler, "RevisionNotFound", method)
        sha, files = snapshot
        if action == "preupload" and method == "POST":
            wanted = json.loads(body)["files"]
            return self.send(handler, 200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None} for f in wanted]})
        if action == "commit" and method == "POST":
            added, deleted, message = {}, set(), ""
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                op = json.loads(line)
                if op["key"] == "header":
                    message = op["value"].get("summary", "")
                elif op["key"] == "file":
                    added[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                elif op["key"] in ("deletedFile", "deletedFolder"):
                    deleted.add(op["value"]["path"])
                else:
                    return self.send(handler, 400, {"error": f"unsupported commit operation {op['key']}"})
            new_sha = repo.commit(message, added, deleted)
            return self.send(handler, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{new_sha}", "commitOid": new_sha,
                                            "pullRequestUrl": None})
        if action in (None, "revision") and method == "GET":
            return self.send(handler, 200, {
                "id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "disabled": False, "gated": False,
                "downloads": 0, "likes": 0, "tags": [], "library_name": "diffusers", "createdAt": repo.created,
                "lastModified": repo.created, "siblings": [{"rfilename": p} for p in sorted(files)],
            })
        if action == "tree" and method == "GET":
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            prefix = f"{subpath.rstrip('/')}/" if subpath else ""
            entries, folders = [], set()
            for p in sorted(files):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix):]
                if "/" in rest and not recursive:
                    folders.add(prefix + rest.split("/")[0])
                    continue
                if recursive:
                    parts = rest.split("/")[:-1]
                    folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
                entries.append({"type": "file", "path": p, "size": len(files[p]), "oid": git_blob_sha(files[p])})
            entries += [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)]
            return self.send(handler, 200, entries)
        if action == "paths-info" and method == "POST":
            return self.send(handler, 200, [{"type": "file", "path": p, "size": len(files[p]), "oid": git_blob_sha(files[p])}
                                            for p in parse_qs(body.decode()).get("paths", []) if p in files])
        return self.send(handler, 404, {"error": f"no route for {method} {action}"}, method=method)

    def resolve(self, handler, method, repo_id, revision, filename) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self.not_found(handler, "RepoNotFound", method)
        snapshot = repo.files(revision)
        if snapshot is None:
            return self.not_found(handler, "RevisionNotFound", method)
        sha, files = snapshot
        if filename not in files:
            self.send(handler, 404, {"error": "Entry not found"},
                      {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": sha},
                      method)
            return
        data = files[filename]
        self.send(handler, 200, data, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"',
                                       "Content-Type": "application/octet-stream"}, method)
