# Source of waterbear-vmm's guest program (see guest.rs). Assemble: as --32 guest.S -o g.o && objcopy -O binary g.o g.bin
        .code32
        .intel_syntax noprefix
        .equ CFG, 0x1000
start:
        mov  esi, dword ptr [CFG+0x08]
prefill:
        mov  dword ptr [esi], esi
        mov  dword ptr [esi+4], 0x57425047
        add  esi, 0x1000
        cmp  esi, dword ptr [CFG+0x0c]
        jb   prefill
        mov  dword ptr [CFG+0x14], 1
        mov  eax, 1
        out  0x11, eax
        mov  esi, dword ptr [CFG+0x08]
        mov  eax, dword ptr [CFG+0x10]
tick:
        inc  eax
        mov  dword ptr [CFG+0x10], eax
        out  0x10, eax
        mov  ecx, dword ptr [CFG+0x04]
        test ecx, ecx
        jz   tick
dirty:
        mov  dword ptr [esi], eax
        mov  dword ptr [esi+4], esi
        add  esi, 0x1000
        cmp  esi, dword ptr [CFG+0x0c]
        jb   next
        mov  esi, dword ptr [CFG+0x08]
next:
        dec  ecx
        jnz  dirty
        jmp  tick
