"""The C export on 32-bit ARM: cross-compiled with Debian's arm-none-eabi GCC, run under qemu-arm, sized for Cortex-M.

    .venv/bin/python tools/c_cross_check.py [--out tools/results/c_cross_check]

The toolchain (gcc-arm-none-eabi, binutils-arm-none-eabi, libnewlib-arm-none-eabi, libnewlib-dev,
qemu-user-static; about 100 MB) comes once from Debian's package archive (`apt-get download`, unpacked
with `dpkg-deb -x` into ~/.cache/rsq/arm-toolchain; no root). For the Fashion-MNIST ResNet-20 RS-Net at
W8A8, W4A4 and W2A2 (each trained 8 steps):

1. exactness on another ISA: `rsq_run` built for 32-bit ARM (Thumb-2, ARMv7-A, soft float: the input's
   float32 division and rounding in software) with newlib, run under qemu-arm (semihosting for stdin and
   stdout) on 16 test images per resolution, as float images and as 8-bit pixels (`-p`); its int32
   logits against rsq.runtime's on the x86 host;
2. footprint on microcontrollers: rsq_model.c and rsq_runtime.c compiled for Cortex-M0+ (no FPU),
   Cortex-M4F and Cortex-M7 (-Os), text + data per object (flash), and the compiler's warnings
   (-Wall -Wextra: 32-bit int, size_t and long).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import cpu_description, save_results  # noqa: E402
from bench_export_extra import fashion_mnist_checkpoint  # noqa: E402

PACKAGES = ("gcc-arm-none-eabi", "binutils-arm-none-eabi", "libnewlib-arm-none-eabi", "libnewlib-dev",
            "qemu-user-static")
TOOLCHAIN = Path.home() / ".cache" / "rsq" / "arm-toolchain"
RUN_TARGET = ("-mcpu=cortex-a9", "-mthumb", "-mfloat-abi=soft")  # what qemu-arm's user mode runs
MCUS = {"Cortex-M0+ (ARMv6-M, no FPU)": ("-mcpu=cortex-m0plus", "-mthumb", "-mfloat-abi=soft"),
        "Cortex-M4F (ARMv7E-M, single-precision FPU)": ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard",
                                                        "-mfpu=fpv4-sp-d16"),
        "Cortex-M7 (ARMv7E-M, double-precision FPU)": ("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard",
                                                       "-mfpu=fpv5-d16")}
IMAGES = 16


def toolchain() -> Path:
    """The unpacked toolchain's root (its usr/bin holds arm-none-eabi-gcc and qemu-arm-static)."""
    if not (TOOLCHAIN / "usr" / "bin" / "qemu-arm-static").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True, capture_output=True)
            for deb in Path(tmp).glob("*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(TOOLCHAIN)], check=True)
    return TOOLCHAIN


def gcc(root: Path, flags, *args, capture=True) -> subprocess.CompletedProcess:
    """arm-none-eabi-gcc with newlib's headers and the multilib for ``flags`` (Debian puts them under /usr)."""
    bin_ = root / "usr" / "bin"
    newlib = root / "usr" / "lib" / "arm-none-eabi" / "newlib"
    multilib = subprocess.run([str(bin_ / "arm-none-eabi-gcc"), *flags, "-print-multi-directory"],
                              capture_output=True, text=True, check=True).stdout.strip()
    command = [str(bin_ / "arm-none-eabi-gcc"), *flags, "-std=c99", "-Wall", "-Wextra",
               "-isystem", str(root / "usr" / "include" / "newlib"), f"-B{newlib / multilib}", f"-L{newlib / multilib}",
               *args]
    return subprocess.run(command, capture_output=capture, text=True)


def run_check(root: Path, folder: Path, runtime, pixels_by_r: dict, floats_by_r: dict) -> list[dict]:
    """rsq_run for 32-bit ARM under qemu-arm: its logits against rsq.runtime's, per resolution and input kind."""
    newlib = root / "usr" / "lib" / "arm-none-eabi" / "newlib"
    elf = folder / "rsq_run.elf"
    done = gcc(root, RUN_TARGET, "-O2", f"-specs={newlib / 'rdimon.specs'}", "-o", str(elf),
               *(str(folder / n) for n in ("rsq_run.c", "rsq_model.c", "rsq_runtime.c")), "-lm")
    if done.returncode != 0:
        raise SystemExit(f"cross-compiling rsq_run failed: {done.stderr[:400]}")
    qemu = str(root / "usr" / "bin" / "qemu-arm-static")
    rows = []
    for r in runtime.model.resolutions:
        for kind, data, flag in (("float32 images", floats_by_r[r], []), ("8-bit pixels", pixels_by_r[r], ["-p"])):
            out = subprocess.run([qemu, str(elf), *flag, str(r)], input=data.tobytes(), capture_output=True,
                                 check=True).stdout
            logits = np.frombuffer(out, np.int32).reshape(len(data), -1)
            reference = runtime.run(floats_by_r[r], r)
            rows.append({"resolution": r, "input": kind, "images": len(data),
                         "identical": bool(np.array_equal(logits, reference)),
                         "differing_logits": int((logits != reference).sum())})
    return rows


def footprint(root: Path, folder: Path) -> list[dict]:
    """text + data (flash) and bss of each source compiled for each MCU at -Os, and the warnings."""
    size = str(root / "usr" / "bin" / "arm-none-eabi-size")
    rows = []
    for mcu, flags in MCUS.items():
        for source in ("rsq_model.c", "rsq_runtime.c"):
            obj = folder / f"{Path(source).stem}_{flags[0][6:]}.o"
            done = gcc(root, flags, "-Os", "-ffunction-sections", "-fdata-sections", "-c", "-o", str(obj),
                       str(folder / source))
            if done.returncode != 0:
                raise SystemExit(f"{mcu}: compiling {source} failed: {done.stderr[:400]}")
            text, data, bss = (int(v) for v in subprocess.run([size, str(obj)], capture_output=True, text=True,
                                                              check=True).stdout.splitlines()[1].split()[:3])
            warnings = sum("warning:" in line for line in done.stderr.splitlines())
            rows.append({"mcu": mcu, "source": source, "flash": text + data, "bss": bss, "warnings": warnings})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tools/results/c_cross_check")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from rsq.checkpoint import checkpoint_config, load_model
    from rsq.data import fashion_mnist
    from rsq.data.memory import _Normalizer
    from rsq.data.multires import resize_batch
    from rsq.export import export_checkpoint, lower_checkpoint_model
    from rsq.runtime import Runtime

    root = toolchain()
    gcc_version = gcc(root, RUN_TARGET, "--version").stdout.splitlines()[0]
    pixels, _ = fashion_mnist.load("test", None)
    pixels = pixels[:IMAGES].reshape(IMAGES, 1, 28, 28)
    normalize = _Normalizer(fashion_mnist.MEAN, fashion_mnist.STD, "cpu")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (8, 4, 2):
            run = fashion_mnist_checkpoint(Path(tmp) / f"w{bits}" / "run", bits)
            export_checkpoint(run, "c", Path(tmp) / f"w{bits}" / "export")
            model, ckpt = load_model(run)
            runtime = Runtime(lower_checkpoint_model(model, checkpoint_config(ckpt)))
            # 8-bit pixels at each resolution: the test images resized in 8 bits (as a device's ISP would);
            # the float images are exactly those pixels normalised, so both inputs must give the same logits.
            by_r = {r: (resize_batch(pixels.float(), r).round().clamp(0, 255).to(torch.uint8) if r != 28 else pixels)
                    for r in runtime.model.resolutions}
            floats = {r: normalize(p).numpy() for r, p in by_r.items()}
            folder = Path(tmp) / f"w{bits}" / "export" / "c"
            results.append({"model": f"ResNet-20 W{bits}A{bits} (first/last 8)",
                            "run": run_check(root, folder, runtime, {r: p.numpy() for r, p in by_r.items()}, floats),
                            "footprint": footprint(root, folder)})
            print(results[-1], flush=True)
    cpu = cpu_description()
    lines = ["# The C export on 32-bit ARM", "", "`tools/c_cross_check.py`", "",
             f"Host CPU: {cpu}. Cross compiler: {gcc_version} (Debian's gcc-arm-none-eabi, newlib); "
             f"emulator: qemu-arm (user mode, semihosting), Debian's qemu-user-static.", "",
             f"Run check: `rsq_run` built with {' '.join(RUN_TARGET)} -O2 (32-bit Thumb-2, software float), "
             f"{IMAGES} Fashion-MNIST test images per resolution, resized in 8 bits where smaller than 28 px, "
             "fed as normalised float32 images and as the pixels themselves (`-p`); the logits against "
             "rsq.runtime's on the host.", ""]
    for result in results:
        lines += [f"## {result['model']}", "", "| resolution | input | images | logits vs rsq.runtime |",
                  "|---:|:---|---:|:---|"]
        lines += [f"| {row['resolution']} | {row['input']} | {row['images']} | "
                  f"{'identical' if row['identical'] else str(row['differing_logits']) + ' differ'} |"
                  for row in result["run"]]
        lines += ["", "| MCU (-Os) | source | flash: text + data (bytes) | bss | warnings (-Wall -Wextra) |",
                  "|:---|:---|---:|---:|---:|"]
        lines += [f"| {row['mcu']} | {row['source']} | {row['flash']} | {row['bss']} | {row['warnings']} |"
                  for row in result["footprint"]]
        lines.append("")
    save_results(args.out, lines, cpu, toolchain=gcc_version, results=results)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
