from setuptools import find_packages, setup

# The twistd plugin lives in the twisted.plugins namespace (no __init__.py
# there, on purpose): list it by hand so that `twistd estat` is found after
# a plain `pip install .`.
setup(
    packages=find_packages(include=["estat", "estat.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["estat_plugin.py"]},
)
