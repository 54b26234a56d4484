"""Print the runtime (and with --dev, the dev) requirements listed in pyproject.toml, one a line."""
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(project["dependencies"])
if "--dev" in sys.argv:
    reqs += project["optional-dependencies"]["dev"]
print("\n".join(reqs))
