//! eBPF side of redirector: one module per hook, maps in `maps`; the
//! connect and getpeername hooks share a core per pair (`connect`,
//! `getpeername`), the decision chain is `redirector_common::decide` over
//! `lookups`; DNS capture (UDP) is `dns`, shared by dns_connect4/6,
//! sendmsg4/6 and recvmsg4/6.
#![no_std]
#![no_main]

mod connect;
mod connect4;
mod connect6;
mod dns;
mod dns_connect4;
mod dns_connect6;
mod getpeername;
mod getpeername4;
mod getpeername6;
mod getsockopt;
mod lookups;
mod maps;
mod recvmsg4;
mod recvmsg6;
mod sendmsg4;
mod sendmsg6;
mod sk_lookup;
mod sk_msg;
mod sockops;
#[cfg(feature = "socklb-standin")]
mod standin_socklb;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
