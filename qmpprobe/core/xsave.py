"""XSAVE state components: what each bit of CPUID leaf 0xD's component bitmaps is, and which
CPUID feature enables it. This is the architecture (Intel SDM vol. 1, 13.1 "XSAVE-supported
features and state-component bitmaps", and vol. 2 CPUID leaf 0DH), not QEMU: QEMU's own names
for the enabling features come from the bits it learned (`Manifest.feature_bits`)."""

from __future__ import annotations

#: Component index → its name and the CPUID bits (`leaf:subleaf:reg:bit`) of the features
#: that use it (a component is there when one of them is).
COMPONENTS: dict[int, tuple[str, tuple[str, ...]]] = {
    0: ("x87", ("0x00000001:0:edx:0",)),
    1: ("SSE", ("0x00000001:0:edx:25",)),
    2: ("AVX (YMM_Hi128)", ("0x00000001:0:ecx:28",)),
    3: ("MPX BNDREGS", ("0x00000007:0:ebx:14",)),
    4: ("MPX BNDCSR", ("0x00000007:0:ebx:14",)),
    5: ("AVX-512 opmask", ("0x00000007:0:ebx:16",)),
    6: ("AVX-512 ZMM_Hi256", ("0x00000007:0:ebx:16",)),
    7: ("AVX-512 Hi16_ZMM", ("0x00000007:0:ebx:16",)),
    8: ("PT", ("0x00000007:0:ebx:25",)),
    9: ("PKRU", ("0x00000007:0:ecx:3",)),
    10: ("PASID", ("0x00000007:0:ecx:29",)),
    11: ("CET_U", ("0x00000007:0:ecx:7", "0x00000007:0:edx:20")),
    12: ("CET_S", ("0x00000007:0:ecx:7", "0x00000007:0:edx:20")),
    13: ("HDC", ("0x00000006:0:eax:13",)),
    14: ("UINTR", ("0x00000007:0:edx:5",)),
    15: ("LBR", ("0x00000007:0:edx:19",)),
    16: ("HWP", ("0x00000006:0:eax:7",)),
    17: ("AMX TILECFG", ("0x00000007:0:edx:24",)),
    18: ("AMX TILEDATA", ("0x00000007:0:edx:24",)),
    19: ("APX", ("0x00000007:1:edx:21",)),
}

#: The component bitmaps of leaf 0xD (`leaf:subleaf:reg` → index of its bit 0): subleaf 0
#: EAX/EDX are XCR0's (user) components, subleaf 1 ECX/EDX IA32_XSS's (supervisor) ones.
BITMAPS = {
    "0x0000000d:0:eax": 0,
    "0x0000000d:0:edx": 32,
    "0x0000000d:1:ecx": 0,
    "0x0000000d:1:edx": 32,
}


def component(bit: str) -> int | None:
    """The XSAVE component a CPUID bit (`0x0000000d:0:eax:5`) stands for, if it is one."""
    word, _, number = bit.rpartition(":")
    if word not in BITMAPS or not number.isdigit():
        return None
    return BITMAPS[word] + int(number)


def component_name(bit: str) -> str:
    """`AVX-512 opmask` for `0x0000000d:0:eax:5`; `XSAVE component N` for an unnamed one;
    empty for a bit outside leaf 0xD's component bitmaps."""
    index = component(bit)
    if index is None:
        return ""
    known = COMPONENTS.get(index)
    return f"XSAVE {known[0]}" if known else f"XSAVE component {index}"


def enabled_by(bit: str) -> tuple[str, ...]:
    """The CPUID bits of the features that use the component a bit stands for (none when it
    is not a component, or the architecture names none)."""
    index = component(bit)
    known = COMPONENTS.get(index) if index is not None else None
    return known[1] if known else ()
