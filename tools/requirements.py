"""Print the runtime (and with --dev, the dev, eval and sweep) requirements listed in pyproject.toml, one a line."""
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(project["dependencies"])
if "--dev" in sys.argv:
    reqs += sum((project["optional-dependencies"][x] for x in ("dev", "eval", "sweep")), [])
print("\n".join(reqs))
