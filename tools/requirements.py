"""Print the runtime (and with --dev, the dev and eval) requirements listed in pyproject.toml, one a line."""
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(project["dependencies"])
if "--dev" in sys.argv:
    reqs += project["optional-dependencies"]["dev"] + project["optional-dependencies"]["eval"]
print("\n".join(reqs))
