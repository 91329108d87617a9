; qmpprobe's guest CPUID dump: a 64 KiB firmware image for `qemu -bios`.
;
; It starts at the reset vector in real mode (no SeaBIOS, disk or fw_cfg), dumps every CPUID
; leaf and subleaf it can enumerate to the debugcon port (0xE9), switches straight to long
; mode, sets up what an OS sets (CR4.OSXSAVE, XCR0 = every supported component, CR4.PKE where
; present), dumps again, and ends QEMU through isa-debug-exit (port 0x501).
;
; Output, one line each, hex without 0x:
;   QMPPROBE-CPUID 1                    header (format version)
;   M <mode>                            a dump starts (real, long)
;   L <leaf> <subleaf> <eax> <ebx> <ecx> <edx>
;   E <mode> <lines>                    the dump of <mode> ended with that many L lines
;   S <step>                            about to do something that may hang QEMU
;   X long                              this CPU has no long mode: no long dump
;   DONE
; A reader that misses an E line or DONE knows the dump is truncated.
;
; Subleaves follow the architecture's rules, not a list of leaves: 4 and 0x8000001D run until
; cache type 0; 0xB, 0x1F and 0x80000026 until level type 0; every other leaf keeps the
; subleaves 1..63 that are non-zero and differ from subleaf 0. Ranges: basic, 0x40000000
; (hypervisor), 0x80000000 (extended), 0xC0000000 (Centaur), each up to the maximum its
; first leaf reports (a range whose first leaf does not report one of its own is skipped).

BASE    equ 0xFFFF0000          ; where the 64 KiB image sits below 4 GiB
PORT    equ 0xE9                ; debugcon
EXITP   equ 0x501               ; isa-debug-exit
PML4    equ 0x1000              ; page tables in low RAM: PML4, PDPT, 4 page directories
PDPT    equ 0x2000
PD      equ 0x3000
STACK   equ 0x9000              ; above the page tables (0x1000-0x6FFF)
; scratch variables in low RAM (DS = 0 in real mode, identity-mapped in long mode)
V_LEAF  equ 0x500
V_SUB   equ 0x504
V_MAX   equ 0x508
V_BASE  equ 0x50C
V_COUNT equ 0x510
V_R0    equ 0x520               ; subleaf 0's eax, ebx, ecx, edx
V_R     equ 0x530               ; the current leaf's eax, ebx, ecx, edx

; ---------------------------------------------------------------------------------------
; The dump, assembled once for 16-bit and once for 64-bit code (%1: a label prefix).
%macro DUMP 1
%1_dump:                        ; esi -> mode name (NUL-terminated); prints M, L..., E
        mov [V_COUNT], dword 0
        push_ptr
        mov esi, s_m
        call %1_puts
        pop_ptr
        push_ptr
        call %1_puts
        mov al, 10
        call %1_putc
        mov dword [V_BASE], 0
%%range:
        mov eax, [V_BASE]
        xor ecx, ecx
        cpuid
        mov [V_MAX], eax
        mov ebx, [V_BASE]
        test ebx, ebx
        jz %%ok_range           ; basic range: always
        cmp eax, ebx            ; others: the max must lie within base..base+0xFF
        jb %%next_range
        add ebx, 0xFF
        cmp eax, ebx
        ja %%next_range
%%ok_range:
        mov eax, [V_BASE]
        mov [V_LEAF], eax
%%leaf:
        mov eax, [V_LEAF]
        xor ecx, ecx
        mov [V_SUB], ecx
        cpuid
        mov [V_R0], eax
        mov [V_R0+4], ebx
        mov [V_R0+8], ecx
        mov [V_R0+12], edx
        call %1_line
        mov dword [V_SUB], 1
%%sub:
        mov eax, [V_LEAF]
        mov ecx, [V_SUB]
        cpuid
        mov [V_R], eax
        mov [V_R+4], ebx
        mov [V_R+8], ecx
        mov [V_R+12], edx
        mov esi, [V_LEAF]
        cmp esi, 4
        je %%cache
        cmp esi, 0x8000001D
        je %%cache
        cmp esi, 0xB
        je %%level
        cmp esi, 0x1F
        je %%level
        cmp esi, 0x80000026
        je %%level
        ; any other leaf: keep a non-zero subleaf that differs from subleaf 0
        mov edi, eax
        or edi, ebx
        or edi, ecx
        or edi, edx
        jz %%next_sub
        cmp eax, [V_R0]
        jne %%emit
        cmp ebx, [V_R0+4]
        jne %%emit
        cmp ecx, [V_R0+8]
        jne %%emit
        cmp edx, [V_R0+12]
        jne %%emit
        jmp %%next_sub
%%cache:
        test eax, 0x1F
        jz %%next_leaf
        jmp %%emit
%%level:
        test ecx, 0xFF00
        jz %%next_leaf
%%emit:
        call %1_line
%%next_sub:
        inc dword [V_SUB]
        cmp dword [V_SUB], 64
        jb %%sub
%%next_leaf:
        mov eax, [V_LEAF]
        cmp eax, [V_MAX]
        jae %%next_range
        inc dword [V_LEAF]
        jmp %%leaf
%%next_range:
        mov eax, [V_BASE]
        add eax, 0x40000000
        mov [V_BASE], eax
        test eax, eax
        jnz %%range
        pop_ptr
        push_ptr
        mov esi, s_e
        call %1_puts
        pop_ptr
        call %1_puts
        mov al, ' '
        call %1_putc
        mov eax, [V_COUNT]
        call %1_hex
        mov al, 10
        call %1_putc
        ret

%1_line:                        ; "L leaf sub eax ebx ecx edx" from V_LEAF, V_SUB, V_R(0)
        inc dword [V_COUNT]
        mov al, 'L'
        call %1_putc
        mov eax, [V_LEAF]
        call %1_spchex
        mov eax, [V_SUB]
        call %1_spchex
        mov edi, V_R            ; subleaf 0's registers are kept apart in V_R0
        cmp dword [V_SUB], 0
        jne %%regs
        mov edi, V_R0
%%regs:
        mov eax, [edi]
        call %1_spchex
        mov eax, [edi + 4]
        call %1_spchex
        mov eax, [edi + 8]
        call %1_spchex
        mov eax, [edi + 12]
        call %1_spchex
        mov al, 10
        call %1_putc
        ret

%1_spchex:                      ; " " then eax as 8 hex digits
        mov edx, eax
        mov al, ' '
        call %1_putc
        mov eax, edx
%1_hex:                         ; eax as 8 hex digits (clobbers eax, ecx, edx)
        mov edx, eax
        mov ecx, 8
%%digit:
        rol edx, 4
        mov eax, edx
        and eax, 0xF
        add al, '0'
        cmp al, '9'
        jbe %%out
        add al, 'a' - '0' - 10
%%out:
        call %1_putc
        dec ecx
        jnz %%digit
        ret

%1_puts:                        ; the NUL-terminated string at esi
%%next:
        mov al, [STRING]
        test al, al
        jz %%done
        call %1_putc
        inc esi
        jmp %%next
%%done:
        ret

%1_putc:
        out PORT, al
        ret
%endmacro

; ---------------------------------------------------------------------------------------
        bits 16
        org BASE

; Real mode: strings are read through CS (base BASE); esi holds their address below 4 GiB,
; so the offset within CS is esi + 0x10000 (mod 2^32).
%define STRING cs:esi + 0x10000
%macro push_ptr 0
        push esi
%endmacro
%macro pop_ptr 0
        pop esi
%endmacro

real_start:
        cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, STACK
        mov esi, s_header
        call r_puts
        mov esi, s_real
        call r_dump

        ; No long mode on this CPU (qemu32, 486, ...): say so and stop.
        mov eax, 0x80000000
        xor ecx, ecx
        cpuid
        cmp eax, 0x80000001
        jb .no_lm
        mov eax, 0x80000001
        xor ecx, ecx
        cpuid
        bt edx, 29              ; LM
        jc .lm
.no_lm:
        mov esi, s_no_long
        call r_puts
        mov esi, s_done
        call r_puts
        mov dx, EXITP
        xor eax, eax
        out dx, al
.halt:
        hlt
        jmp .halt
.lm:
        ; Page tables: identity-map 4 GiB with 2 MiB pages.
        mov esi, s_step_long
        call r_puts
        xor eax, eax
        mov edi, PML4
        mov ecx, (PD + 4 * 0x1000 - PML4) / 4
        cld
        a32 rep stosd
        mov dword [PML4], PDPT | 3
        mov dword [PDPT], PD | 3
        mov dword [PDPT + 8], (PD + 0x1000) | 3
        mov dword [PDPT + 16], (PD + 0x2000) | 3
        mov dword [PDPT + 24], (PD + 0x3000) | 3
        mov edi, PD
        mov eax, 0x83           ; present, writable, 2 MiB
        mov ecx, 2048
.pde:
        mov [edi], eax
        add eax, 0x200000
        add edi, 8
        loop .pde, ecx

        o32 lgdt [cs:gdtr - $$]
        mov eax, cr4
        or eax, 1 << 5          ; PAE
        mov cr4, eax
        mov eax, PML4
        mov cr3, eax
        mov ecx, 0xC0000080     ; EFER
        rdmsr
        or eax, 1 << 8          ; LME
        wrmsr
        mov eax, cr0
        or eax, 0x80000001      ; PG | PE: from real mode straight to long mode
        mov cr0, eax
        jmp dword 0x08:long_start

        DUMP r

; ---------------------------------------------------------------------------------------
        bits 64
%undef STRING
%define STRING esi
%unmacro push_ptr 0
%unmacro pop_ptr 0
%macro push_ptr 0
        push rsi
%endmacro
%macro pop_ptr 0
        pop rsi
%endmacro

long_start:
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov rsp, STACK
        ; A leaf above the highest basic leaf answers as the highest one does (Intel's rule,
        ; and QEMU's): qemu64 on pc-i440fx-2.2 has level 4, and leaf 7 read there is leaf 4,
        ; whose ECX has bit 3 set, so CR4.PKE was set on a CPU without PKU and the guest hung.
        ; Leaves 0xD and 7 are read only where they exist.
        xor eax, eax
        cpuid
        mov edi, eax            ; the highest basic leaf
        cmp edi, 0xD
        jb .no_xsave
        mov eax, 1
        xor ecx, ecx
        cpuid
        bt ecx, 26              ; XSAVE
        jnc .no_xsave
        mov esi, s_step_osxsave
        call l_puts
        mov rax, cr4
        or eax, 1 << 18         ; OSXSAVE
        mov cr4, rax
        mov esi, s_step_xcr0
        call l_puts
        mov eax, 0xD
        xor ecx, ecx
        cpuid                   ; eax:edx = the components this CPU supports in XCR0
        xor ecx, ecx
        xsetbv
.no_xsave:
        cmp edi, 7
        jb .no_pku
        mov eax, 7
        xor ecx, ecx
        cpuid
        bt ecx, 3               ; PKU
        jnc .no_pku
        mov esi, s_step_pke
        call l_puts
        mov rax, cr4
        or eax, 1 << 22         ; PKE
        mov cr4, rax
.no_pku:
        mov esi, s_long
        call l_dump
        mov esi, s_done
        call l_puts
        mov dx, EXITP
        xor eax, eax
        out dx, al
.halt:
        hlt
        jmp .halt

        DUMP l

; ---------------------------------------------------------------------------------------
s_header:       db "QMPPROBE-CPUID 1", 10, 0
s_m:            db "M ", 0
s_e:            db "E ", 0
s_real:         db "real", 0
s_long:         db "long", 0
s_step_long:    db "S long", 10, 0
s_no_long:      db "X long", 10, 0
s_step_osxsave: db "S osxsave", 10, 0
s_step_xcr0:    db "S xcr0", 10, 0
s_step_pke:     db "S pke", 10, 0
s_done:         db "DONE", 10, 0

        align 8
; The accessed bits are set: the GDT lives in ROM, and under KVM a CPU that has to set them
; writes to ROM again and again instead of going on.
gdt:    dq 0
        dq 0x00AF9B000000FFFF   ; 0x08: 64-bit code
        dq 0x00CF93000000FFFF   ; 0x10: data
gdtr:   dw gdtr - gdt - 1
        dd gdt

        times 0xFFF0 - ($ - $$) db 0xF4
        bits 16
reset:  jmp real_start          ; the reset vector: CS base 0xFFFF0000, IP 0xFFF0
        cli
        hlt
        times 0x10000 - ($ - $$) db 0xF4
