"""Python source code as long documents: the ``pycode`` source of examples/build_book_corpus.py.

Every document is one ``.py`` file of a pinned, permissively licensed, pure-Python PyPI package
(its ``py3-none-any`` wheel, fetched with ``pip download --no-deps --only-binary :all:`` into a
cache) or of a local package archive (``--pycode-dir``: wheels, sdists ``.tar.gz``/``.zip``, or
unpacked folders). Files smaller than ``--min-file-bytes`` are dropped, then exact duplicates
(same document text; the first in package order, then path order, is kept), so that a file
vendored by two packages can never sit in two splits. The split unit is the package.

A file becomes a document in fairseq's ``complete_doc`` layout (one line per item, an empty line
between documents) by: newlines normalized to ``\\n``, tabs expanded to 8 columns (Python's own
rule), any other whitespace character (form feed, vertical tab, no-break space...) replaced by a
space, trailing whitespace stripped, and **blank lines dropped** (a blank line would end the
document). Indentation is kept as leading spaces; see build_book_corpus.CODE_SPM_OPTIONS for how
the sentencepiece model keeps it.
"""

import hashlib
import logging
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from email.parser import HeaderParser
from typing import Dict, List, Optional, Tuple

logger = logging.getLogger("build_book_corpus")

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fairseq_longmem", "pycode")

# The pinned packages: pure-Python wheels under MIT, BSD or Apache-2.0 licences (as their metadata
# says; the manifest records what each archive declares). Chosen for size and variety, avoiding
# packages that vendor other packages (pip, setuptools) or are mostly generated tables.
PINNED = (
    "attrs==23.1.0", "beautifulsoup4==4.12.2", "click==8.1.7", "flask==3.0.0", "fsspec==2023.12.0",
    "html5lib==1.1", "httpcore==1.0.2", "httpx==0.25.2", "jedi==0.19.1", "jinja2==3.1.2",
    "jsonschema==4.20.0", "markdown==3.5.1", "marshmallow==3.20.1", "more-itertools==10.1.0",
    "oauthlib==3.2.2", "packaging==23.2", "parso==0.8.3", "prompt-toolkit==3.0.41",
    "pyasn1==0.5.1", "pydantic==2.5.2", "pyparsing==3.1.1", "pytest==7.4.3",
    "python-dateutil==2.8.2", "requests==2.31.0", "rich==13.7.0", "sortedcontainers==2.4.0",
    "sqlparse==0.4.4", "starlette==0.33.0", "toolz==0.12.0", "traitlets==5.14.0",
    "urllib3==2.1.0", "werkzeug==3.0.1",
)
ARCHIVES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
LICENSE_FILES = re.compile(r"(^|/)(LICEN[CS]E|COPYING)[^/]*$", re.IGNORECASE)


class PackageError(RuntimeError):
    """A problem the user must fix (shown as one ``error:`` line by the builder)."""


@dataclass
class Package:
    name: str
    version: str
    license: str
    archive: str  # file or folder name it was read from
    files: Dict[str, str] = field(default_factory=dict)  # path -> source text, .py files only
    kept: int = 0
    dropped_small: int = 0
    dropped_duplicate: int = 0
    characters: int = 0
    split: str = ""

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "version", "license", "archive", "split", "kept",
                                               "dropped_small", "dropped_duplicate", "characters")}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pin(spec: str) -> Tuple[str, str]:
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)\s*", spec)
    if not m:
        raise PackageError(f"--pycode-packages: {spec!r} is not NAME==VERSION")
    return m.group(1), m.group(2)


# --------------------------------------------------------------------------- reading archives


def _members(path: str) -> Dict[str, bytes]:
    """name -> bytes of the .py files and metadata/licence files of an archive or folder."""
    def wanted(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return name.endswith(".py") or base in ("METADATA", "PKG-INFO") or bool(LICENSE_FILES.search(name))

    out = {}
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for f in sorted(files):
                full = os.path.join(root, f)
                rel = os.path.relpath(full, path).replace(os.sep, "/")
                if wanted(rel) and os.path.isfile(full):
                    with open(full, "rb") as fh:
                        out[rel] = fh.read()
    elif path.endswith((".whl", ".zip")):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.is_dir() and wanted(info.filename):
                    out[info.filename] = z.read(info)
    else:
        with tarfile.open(path) as t:
            for m in t.getmembers():
                if m.isfile() and wanted(m.name):
                    out[m.name] = t.extractfile(m).read()
    return out


def _license(meta, members: Dict[str, bytes]) -> str:
    """License-Expression, else the licence classifiers, else a one-line License field, else the
    first line of a LICENSE/COPYING file, else 'unknown'."""
    if meta is not None:
        if meta.get("License-Expression"):
            return meta["License-Expression"].strip()
        classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                       if c.startswith("License ::") and c.split("::")[-1].strip() != "OSI Approved"]
        if classifiers:
            return "; ".join(classifiers)
        lic = (meta.get("License") or "").strip()
        if lic and "\n" not in lic and len(lic) <= 100 and lic.upper() != "UNKNOWN":
            return lic
    for name in sorted(n for n in members if LICENSE_FILES.search(n)):
        first = next((line.strip() for line in members[name].decode("utf-8", "replace").splitlines()
                      if line.strip()), "")
        if first:
            return first[:100]
    return "unknown"


def read_package(path: str) -> Package:
    """A Package (name, version, licence, .py sources) from a wheel, sdist or folder."""
    try:
        members = _members(path)
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise PackageError(f"cannot read package archive {path}: {e}") from None
    metas = sorted((n for n in members if n.rsplit("/", 1)[-1] in ("METADATA", "PKG-INFO")),
                   key=lambda n: (n.count("/"), n))
    meta = HeaderParser().parsestr(members[metas[0]].decode("utf-8", "replace")) if metas else None
    base = os.path.basename(path.rstrip("/\\"))
    stem = next((base[: -len(e)] for e in ARCHIVES if base.endswith(e)), base)
    fallback = re.match(r"(.+?)-(\d[^-]*)", stem)
    name = (meta.get("Name") if meta else None) or (fallback.group(1) if fallback else stem)
    version = (meta.get("Version") if meta else None) or (fallback.group(2) if fallback else "unknown")
    pkg = Package(name.strip(), version.strip(), _license(meta, members), base)
    for n in sorted(members):
        if n.endswith(".py"):
            # sdists and folders hold the package under one top folder; paths are kept as they are
            pkg.files[n] = members[n].decode("utf-8", "replace")
    return pkg


def code_document(source: str) -> str:
    """A source file as one complete_doc document (see the module docstring)."""
    out = []
    for line in source.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = re.sub(r"[^\S ]", " ", line.expandtabs(8)).rstrip()
        if line:
            out.append(line)
    return "\n".join(out)


def select_files(packages: List[Package], min_file_bytes: int) -> List[Tuple[Package, str, str]]:
    """(package, path, document) of every kept file, packages in the given order, paths sorted;
    fills each package's kept/dropped counts and characters."""
    seen = set()
    docs = []
    for pkg in packages:
        for path, source in sorted(pkg.files.items()):
            if len(source.encode("utf-8")) < min_file_bytes:
                pkg.dropped_small += 1
                continue
            doc = code_document(source)
            digest = hashlib.sha256(doc.encode("utf-8")).hexdigest()
            if not doc or digest in seen:
                pkg.dropped_duplicate += 1
                continue
            seen.add(digest)
            pkg.kept += 1
            pkg.characters += len(doc)
            docs.append((pkg, path, doc))
    return docs


# --------------------------------------------------------------------------- fetching


def _cached_wheel(folder: str, name: str, version: str) -> Optional[str]:
    if not os.path.isdir(folder):
        return None
    key = (canonical(name), version.lower())
    hits = sorted(f for f in os.listdir(folder) if f.endswith(".whl") and f.count("-") >= 4
                  and (canonical(f.split("-")[0]), f.split("-")[1].lower()) == key)
    return os.path.join(folder, hits[0]) if hits else None


def fetch_wheels(pins: List[str], cache: str) -> List[str]:
    """The wheel of each NAME==VERSION, downloaded once into cache by pip; a package without a
    pure-Python (``-none-any``) wheel is refused."""
    folder = os.path.join(cache, "wheels")
    wanted = [parse_pin(p) for p in pins]
    missing = [f"{n}=={v}" for n, v in wanted if _cached_wheel(folder, n, v) is None]
    if missing:
        logger.info("pip download %d packages into %s", len(missing), folder)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--timeout", "20", "--retries", "1", "--disable-pip-version-check", "-d", folder, *missing]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            lines = [ln.strip() for ln in res.stderr.splitlines() if ln.strip().startswith("ERROR")]
            detail = lines[0] if lines else (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise PackageError(f"pip download of the pycode packages failed (is PyPI reachable?): {detail}; "
                               f"or pass --pycode-dir with local package archives")
    paths = []
    for n, v in wanted:
        path = _cached_wheel(folder, n, v)
        if path is None:
            raise PackageError(f"pip download produced no wheel for {n}=={v} in {folder}")
        if not path.endswith("-none-any.whl"):
            raise PackageError(f"{os.path.basename(path)} is not a pure-Python wheel; choose another package")
        paths.append(path)
    return paths


def local_archives(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        raise PackageError(f"--pycode-dir {folder} is not a folder")
    entries = sorted(e for e in os.listdir(folder)
                     if e.endswith(ARCHIVES) or os.path.isdir(os.path.join(folder, e)))
    if not entries:
        raise PackageError(f"--pycode-dir {folder} holds no package archives ({', '.join(ARCHIVES)}) or folders")
    return [os.path.join(folder, e) for e in entries]


def collect(pins: List[str], pycode_dir: Optional[str], cache: str,
            min_file_bytes: int) -> Tuple[List[Package], List[Tuple[Package, str, str]]]:
    """All packages (sorted by name) and the kept (package, path, document) triples."""
    paths = local_archives(pycode_dir) if pycode_dir else fetch_wheels(pins, cache)
    packages = sorted((read_package(p) for p in paths), key=lambda p: (canonical(p.name), p.version))
    names = [canonical(p.name) for p in packages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PackageError(f"package {dup[0]} appears twice; give one version of each package")
    return packages, select_files(packages, min_file_bytes)
