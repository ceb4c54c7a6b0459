//! The guest program every waterbear test VM runs.
//!
//! It is real x86 machine code, executed by the vCPU in 32-bit protected mode
//! with flat 4 GiB segments and paging off (the VMM sets the hidden segment
//! state directly in `sregs`, so no GDT and no firmware are needed).
//!
//! Guest physical layout:
//!
//! | GPA               | what                                              |
//! |-------------------|---------------------------------------------------|
//! | `0x1000` (page 1) | config/status block, see `CFG_*` offsets           |
//! | `0x2000` (page 2) | the program below                                  |
//! | `0x10000..end`    | the "working set" region the guest dirties         |
//!
//! The program (source in `guest.S` next to this file, assembled with
//! `as --32` and checked byte for byte by the `listing_matches_bytes` test):
//!
//! ```text
//!  0: 8b 35 08 10 00 00     mov  esi, [0x1008]          ; cursor = region_start
//!  6: 89 36                 prefill: mov [esi], esi      ; pattern: own address
//!  8: c7 46 04 47 50 42 57  mov  dword [esi+4], 'GPBW'   ; + a marker
//!  f: 81 c6 00 10 00 00     add  esi, 0x1000
//! 15: 3b 35 0c 10 00 00     cmp  esi, [0x100c]          ; region_end
//! 1b: 72 e9                 jb   prefill
//! 1d: c7 05 14 10 00 00 01  mov  dword [0x1014], 1      ; prefill done
//! 27: b8 01 00 00 00        mov  eax, 1
//! 2c: e7 11                 out  0x11, eax              ; PORT_READY
//! 2e: 8b 35 08 10 00 00     mov  esi, [0x1008]
//! 34: a1 10 10 00 00        mov  eax, [0x1010]          ; counter
//! 39: 40                    tick: inc eax
//! 3a: a3 10 10 00 00        mov  [0x1010], eax
//! 3f: e7 10                 out  0x10, eax              ; PORT_PROGRESS (tick barrier)
//! 41: 8b 0d 04 10 00 00     mov  ecx, [0x1004]          ; pages_per_tick (host-tunable)
//! 47: 85 c9                 test ecx, ecx
//! 49: 74 ee                 jz   tick
//! 4b: 89 06                 dirty: mov [esi], eax        ; pattern: counter
//! 4d: 89 76 04              mov  [esi+4], esi           ; + own address
//! 50: 81 c6 00 10 00 00     add  esi, 0x1000
//! 56: 3b 35 0c 10 00 00     cmp  esi, [0x100c]
//! 5c: 72 06                 jb   next
//! 5e: 8b 35 08 10 00 00     mov  esi, [0x1008]          ; wrap around
//! 64: 49                    next: dec ecx
//! 65: 75 e4                 jnz  dirty
//! 67: eb d0                 jmp  tick
//! ```
//!
//! The guest first writes a pattern into every page of its region (so a
//! migration really has the whole memory to move), reports `PORT_READY`, then
//! loops: increment the counter, report it with `OUT PORT_PROGRESS`, and write
//! into `pages_per_tick` consecutive pages. The VMM holds the vCPU at each
//! progress OUT until the next tick of its clock (`tick_us`), like a timer
//! interrupt would, so the dirty rate is `pages_per_tick * 4096 / tick_us`.

/// The program bytes (see the listing in the module docs).
pub const PROGRAM: [u8; 105] = [
    0x8b, 0x35, 0x08, 0x10, 0x00, 0x00, 0x89, 0x36, 0xc7, 0x46, 0x04, 0x47, 0x50, 0x42, 0x57, 0x81,
    0xc6, 0x00, 0x10, 0x00, 0x00, 0x3b, 0x35, 0x0c, 0x10, 0x00, 0x00, 0x72, 0xe9, 0xc7, 0x05, 0x14,
    0x10, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x00, 0x00, 0xe7, 0x11, 0x8b, 0x35,
    0x08, 0x10, 0x00, 0x00, 0xa1, 0x10, 0x10, 0x00, 0x00, 0x40, 0xa3, 0x10, 0x10, 0x00, 0x00, 0xe7,
    0x10, 0x8b, 0x0d, 0x04, 0x10, 0x00, 0x00, 0x85, 0xc9, 0x74, 0xee, 0x89, 0x06, 0x89, 0x76, 0x04,
    0x81, 0xc6, 0x00, 0x10, 0x00, 0x00, 0x3b, 0x35, 0x0c, 0x10, 0x00, 0x00, 0x72, 0x06, 0x8b, 0x35,
    0x08, 0x10, 0x00, 0x00, 0x49, 0x75, 0xe4, 0xeb, 0xd0,
];

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// GPA of the config/status block.
pub const CFG_GPA: u64 = 0x1000;
/// Offset of the magic word the VMM writes at boot.
pub const CFG_MAGIC: u64 = 0x00;
/// Offset of `pages_per_tick` (u32, written by the host, read by the guest every tick).
pub const CFG_PAGES_PER_TICK: u64 = 0x04;
/// Offset of the region start (u32).
pub const CFG_REGION_START: u64 = 0x08;
/// Offset of the region end (u32, exclusive).
pub const CFG_REGION_END: u64 = 0x0c;
/// Offset of the guest's counter (u32, written by the guest).
pub const CFG_COUNTER: u64 = 0x10;
/// Offset of the prefill-done flag (u32, written by the guest).
pub const CFG_READY: u64 = 0x14;
/// Value of the magic word.
pub const CFG_MAGIC_VALUE: u32 = 0x5342_5757; // "WWBS"
/// GPA where the program is loaded and where execution starts.
pub const CODE_GPA: u64 = 0x2000;
/// First byte of the region the guest dirties.
pub const REGION_START: u64 = 0x10000;
/// Port the guest reports its counter on, once per tick.
pub const PORT_PROGRESS: u16 = 0x10;
/// Port the guest writes once when the prefill pass is done.
pub const PORT_READY: u16 = 0x11;
/// Smallest guest: config + code + at least 16 region pages.
pub const MIN_MEM_BYTES: u64 = REGION_START + 16 * PAGE_SIZE;
/// Largest guest: the program addresses memory with 32-bit pointers and the
/// region end must fit in a u32.
pub const MAX_MEM_BYTES: u64 = 3 << 30;

/// Pages per tick that give `bytes_per_sec` of dirtying at a tick of `tick_us`
/// microseconds (rounded to the nearest page; 1 MB = 10^6 bytes).
pub fn pages_per_tick_for_rate(bytes_per_sec: u64, tick_us: u32) -> u32 {
    let bytes_per_tick = bytes_per_sec as f64 * f64::from(tick_us) / 1e6;
    (bytes_per_tick / PAGE_SIZE as f64).round() as u32
}

/// Dirty rate in bytes per second for a given tick configuration.
pub fn rate_for_pages_per_tick(pages_per_tick: u32, tick_us: u32) -> u64 {
    if tick_us == 0 {
        return 0;
    }
    u64::from(pages_per_tick) * PAGE_SIZE * 1_000_000 / u64::from(tick_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte array must be exactly what `guest.S` assembles to; this checks
    /// a few instruction boundaries named in the listing, so an edit to one
    /// without the other is caught.
    #[test]
    fn listing_matches_bytes() {
        assert_eq!(PROGRAM.len(), 0x69);
        // `out 0x11, eax` at 0x2c and `out 0x10, eax` at 0x3f.
        assert_eq!(&PROGRAM[0x2c..0x2e], &[0xe7, PORT_READY as u8]);
        assert_eq!(&PROGRAM[0x3f..0x41], &[0xe7, PORT_PROGRESS as u8]);
        // Absolute config addresses are the ones the constants name.
        let counter = (CFG_GPA + CFG_COUNTER) as u32;
        assert_eq!(&PROGRAM[0x3b..0x3f], &counter.to_le_bytes());
        let ppt = (CFG_GPA + CFG_PAGES_PER_TICK) as u32;
        assert_eq!(&PROGRAM[0x43..0x47], &ppt.to_le_bytes());
        // The final jmp goes back to `tick` at 0x39.
        assert_eq!(0x69_i32 + i32::from(PROGRAM[0x68] as i8), 0x39);
    }

    #[test]
    fn rate_helpers_round_trip() {
        let ppt = pages_per_tick_for_rate(500_000_000, 1000);
        assert_eq!(ppt, 122);
        let rate = rate_for_pages_per_tick(ppt, 1000);
        assert!((499_000_000..=500_000_000).contains(&rate), "{rate}");
        assert_eq!(pages_per_tick_for_rate(0, 1000), 0);
    }
}
