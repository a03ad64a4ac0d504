"""The ``info`` command: the library, llama.cpp's build, this machine's devices, the cache."""

from __future__ import annotations

import argparse
import json

from ._format import size


def info_command(args: argparse.Namespace) -> int:
    from ..generate._context import default_threads
    from ..native._library import system_info

    if args.rpc:  # list these servers' devices too
        from ..native._devices import rpc_devices
        from ..native._library import get

        for address in (part.strip() for part in args.rpc.split(",") if part.strip()):
            rpc_devices(get(), address)
    info = system_info()
    info["default_threads"] = default_threads()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    build = info.get("build") or {}
    if isinstance(build, dict):
        info["build"] = (f"{build.get('build_type', '?')}, {'portable' if build.get('portable') else 'native'}"
                         f"{', ' + ' '.join(build['cmake_args']) if build.get('cmake_args') else ''}")
    devices = info.pop("devices")
    for key, value in info.items():
        print(f"{key.replace('_', ' '):>17}: {value}")
    print(f"{'devices':>17}:")
    for device in devices:
        memory = (f"{size(device['memory_free'])} free of {size(device['memory_total'])}"
                  if device["memory_total"] else "memory unknown")
        print(f"{'':>19}{device['name']} ({device['type']}, {device['backend']}): {device['description']}, {memory}")
    return 0
