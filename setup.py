"""Build configuration beyond pyproject.toml: the optional C index core (kvindex._native).

``optional=True``: without a compiler (or Python headers) the build logs a warning and the
install still succeeds; kvindex then falls back to the pure-Python MemoryIndex."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvindex._native",
            sources=[
                "src/kvindex/_native_c/module.c",
                "src/kvindex/_native_c/index.c",
                "src/kvindex/_native_c/keys.c",
            ],
            depends=["src/kvindex/_native_c/native.h"],
            extra_compile_args=["-std=c99", "-O2"],
            optional=True,
        )
    ]
)
