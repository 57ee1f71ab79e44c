//! The user-space TLS record layer (`tls::record_layer`): sealing and opening 1 MiB of
//! application data in full 16 KiB records, as a tunnel without kTLS does for every payload
//! byte. Its AEAD implementation decides most of what user-space TLS costs per GB. AES-256-GCM
//! only: rustls makes a 16-byte `AeadKey` only inside itself (a handshake), so AES-128-GCM is
//! not keyed from here.
//!
//! Run: `cargo bench --bench record_layer -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::ConnectionTrafficSecrets;

use ringtun::tls::record_layer::{Opener, Sealer};

const MIB: usize = 1 << 20;

fn secrets() -> ConnectionTrafficSecrets {
    ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from([7u8; 32]),
        iv: Iv::from([9u8; 12]),
    }
}

fn bench(c: &mut Criterion) {
    let plaintext = vec![0x5au8; MIB];
    let mut g = c.benchmark_group("record_layer");
    g.throughput(Throughput::Bytes(MIB as u64));
    {
        let name = "aes_256_gcm";
        let mut sealer = Sealer::new(&secrets(), 0).unwrap();
        let mut wire = Vec::with_capacity(MIB + MIB / 64);
        g.bench_function(format!("seal_1MiB/{name}"), |b| {
            b.iter(|| {
                wire.clear();
                sealer.seal(black_box(&plaintext), &mut wire).unwrap();
            })
        });
        // Records a peer sealed from sequence 0: each iteration opens them all in place.
        let mut sealed = Vec::new();
        Sealer::new(&secrets(), 0)
            .unwrap()
            .seal(&plaintext, &mut sealed)
            .unwrap();
        g.bench_function(format!("open_1MiB/{name}"), |b| {
            b.iter_batched_ref(
                || (sealed.clone(), Opener::new(&secrets(), 0).unwrap()),
                |(buf, opener)| {
                    let mut off = 0;
                    while let Some(r) = opener.open_first(&mut buf[off..]).unwrap() {
                        off += r.consumed;
                    }
                    assert_eq!(off, buf.len());
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
