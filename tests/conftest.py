"""Shared pytest hooks."""

from __future__ import annotations


def pytest_report_header() -> str:
    from h2rec import _core

    return f"h2rec._core: simd_level={_core.simd_level()}, gemm_simd_level={_core.gemm_simd_level()}"
