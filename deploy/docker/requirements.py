"""Print crmstream's runtime dependencies from pyproject.toml, one per line: the
project's and its ``fit`` extra's (``crmstream fit`` runs in the image).

The image's build stage installs these in a layer of their own, before it
copies crmstream's sources: a code change then rebuilds only the small
crmstream wheel, not numba, bytewax and the rest (Dockerfile).
"""

import sys
import tomllib
from pathlib import Path

path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
project = tomllib.loads(path.read_text())["project"]
extras = project.get("optional-dependencies", {}).get("fit", [])
print("\n".join([*project["dependencies"], *extras]))
