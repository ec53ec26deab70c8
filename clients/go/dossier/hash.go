// Patient hashing for the Dossier Go client.
//
// This file implements XXH3-64 with a seed (XXH3_64bits_withSeed, xxHash
// v0.8) as described by the xxHash specification (doc/xxhash_spec.md and
// xxhash.h). docs/client-protocol.md defines the patient hash as the XXH3-64
// of the UTF-8 bytes of the patient id, seeded with PatientHashSeed; every
// client must produce bit-identical results, which the shared test vectors in
// clients/testdata/patient-hash-vectors.json check.
//
// The implementation is scalar and uses only the standard library. xxh3_64
// never allocates (the seed-derived secret for long inputs lives on the
// stack); PatientHash allocates only for strings longer than stackHashMax.

package dossier

import (
	"encoding/binary"
	"math/bits"
)

// PatientHashSeed is the XXH3 seed for patient hashes: the ASCII bytes
// "DOSSIER1" read as a little-endian uint64.
const PatientHashSeed uint64 = 0x3152454953534f44

// PatientHash returns the XXH3-64 hash of the UTF-8 bytes of patientID,
// seeded with PatientHashSeed.
func PatientHash(patientID string) uint64 {
	// The []byte conversion does not escape, so for strings of up to 32
	// bytes the compiler copies into a small stack buffer; longer strings
	// would be heap-allocated, so up to stackHashMax bytes we copy into our
	// own stack buffer instead (patient ids are at most 64 bytes). Only
	// unusually long inputs allocate.
	if len(patientID) > 32 && len(patientID) <= stackHashMax {
		var buf [stackHashMax]byte
		n := copy(buf[:], patientID)
		return xxh3_64(buf[:n], PatientHashSeed)
	}
	return xxh3_64([]byte(patientID), PatientHashSeed)
}

// stackHashMax is the longest string PatientHash hashes without allocating.
const stackHashMax = 256

// Primes used by XXH32/XXH64/XXH3.
const (
	prime32_1 uint64 = 0x9E3779B1
	prime32_2 uint64 = 0x85EBCA77
	prime32_3 uint64 = 0xC2B2AE3D

	prime64_1 uint64 = 0x9E3779B185EBCA87
	prime64_2 uint64 = 0xC2B2AE3D27D4EB4F
	prime64_3 uint64 = 0x165667B19E3779F9
	prime64_4 uint64 = 0x85EBCA77C2B2AE63
	prime64_5 uint64 = 0x27D4EB2F165667C5

	primeMX1 uint64 = 0x165667919E3779F9
	primeMX2 uint64 = 0x9FB21C651E98DF25
)

// XXH3 layout parameters.
const (
	secretSize         = 192 // size of the default secret
	secretSizeMin      = 136 // minimum secret size allowed by XXH3
	stripeLen          = 64  // bytes consumed per stripe in the long path
	secretConsumeRate  = 8   // secret advance per stripe
	accNB              = stripeLen / 8
	secretLastAccStart = 7  // offset for the last stripe's secret
	secretMergeStart   = 11 // offset of the secret used to merge accumulators
	midSizeStartOffset = 3  // 129..240: secret offset for rounds 8+
	midSizeLastOffset  = 17 // 129..240: secret offset for the final round

	stripesPerBlock = (secretSize - stripeLen) / secretConsumeRate
	blockLen        = stripeLen * stripesPerBlock
)

// kSecret is the default 192-byte XXH3 secret from the specification.
var kSecret = [secretSize]byte{
	0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
	0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
	0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
	0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
	0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
	0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
	0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
	0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
	0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
	0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
	0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
	0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
}

func readLE32(b []byte) uint64 { return uint64(binary.LittleEndian.Uint32(b)) }
func readLE64(b []byte) uint64 { return binary.LittleEndian.Uint64(b) }

// mul128Fold64 multiplies two 64-bit values into 128 bits and XORs the
// high and low halves together.
func mul128Fold64(a, b uint64) uint64 {
	hi, lo := bits.Mul64(a, b)
	return hi ^ lo
}

// xxh64Avalanche is the XXH64 final mix, reused by XXH3 for 0..3 byte inputs.
func xxh64Avalanche(h uint64) uint64 {
	h ^= h >> 33
	h *= prime64_2
	h ^= h >> 29
	h *= prime64_3
	h ^= h >> 32
	return h
}

// xxh3Avalanche is the lighter XXH3 final mix.
func xxh3Avalanche(h uint64) uint64 {
	h ^= h >> 37
	h *= primeMX1
	h ^= h >> 32
	return h
}

// rrmxmx is the stronger final mix used for 4..8 byte inputs.
func rrmxmx(h uint64, length uint64) uint64 {
	h ^= bits.RotateLeft64(h, 49) ^ bits.RotateLeft64(h, 24)
	h *= primeMX2
	h ^= (h >> 35) + length
	h *= primeMX2
	h ^= h >> 28
	return h
}

// xxh3_64 computes XXH3-64 of data with the given seed
// (equivalent to XXH3_64bits_withSeed).
func xxh3_64(data []byte, seed uint64) uint64 {
	n := len(data)
	switch {
	case n <= 16:
		return len0To16(data, seed)
	case n <= 128:
		return len17To128(data, seed)
	case n <= 240:
		return len129To240(data, seed)
	default:
		return hashLong(data, seed)
	}
}

func len0To16(data []byte, seed uint64) uint64 {
	n := len(data)
	s := kSecret[:]
	switch {
	case n > 8:
		return len9To16(data, s, seed)
	case n >= 4:
		return len4To8(data, s, seed)
	case n > 0:
		return len1To3(data, s, seed)
	default:
		return xxh64Avalanche(seed ^ readLE64(s[56:]) ^ readLE64(s[64:]))
	}
}

// len1To3: the 1..3 input bytes and the length are packed into 32 bits.
func len1To3(data []byte, s []byte, seed uint64) uint64 {
	n := len(data)
	c1 := uint32(data[0])
	c2 := uint32(data[n>>1])
	c3 := uint32(data[n-1])
	combined := c1<<16 | c2<<24 | c3 | uint32(n)<<8
	bitflip := (readLE32(s) ^ readLE32(s[4:])) + seed
	return xxh64Avalanche(uint64(combined) ^ bitflip)
}

// len4To8: the first and last 4 bytes (possibly overlapping) form one u64.
func len4To8(data []byte, s []byte, seed uint64) uint64 {
	n := len(data)
	seed ^= uint64(bits.ReverseBytes32(uint32(seed))) << 32
	in1 := readLE32(data)
	in2 := readLE32(data[n-4:])
	bitflip := (readLE64(s[8:]) ^ readLE64(s[16:])) - seed
	in64 := in2 + in1<<32
	return rrmxmx(in64^bitflip, uint64(n))
}

// len9To16: the first and last 8 bytes (possibly overlapping).
func len9To16(data []byte, s []byte, seed uint64) uint64 {
	n := len(data)
	bitflip1 := (readLE64(s[24:]) ^ readLE64(s[32:])) + seed
	bitflip2 := (readLE64(s[40:]) ^ readLE64(s[48:])) - seed
	lo := readLE64(data) ^ bitflip1
	hi := readLE64(data[n-8:]) ^ bitflip2
	acc := uint64(n) + bits.ReverseBytes64(lo) + hi + mul128Fold64(lo, hi)
	return xxh3Avalanche(acc)
}

// mix16B mixes 16 input bytes with 16 secret bytes and the seed.
func mix16B(in []byte, s []byte, seed uint64) uint64 {
	lo := readLE64(in)
	hi := readLE64(in[8:])
	return mul128Fold64(lo^(readLE64(s)+seed), hi^(readLE64(s[8:])-seed))
}

// len17To128 mixes 16-byte pairs taken from both ends of the input.
func len17To128(data []byte, seed uint64) uint64 {
	n := len(data)
	s := kSecret[:]
	acc := uint64(n) * prime64_1
	if n > 32 {
		if n > 64 {
			if n > 96 {
				acc += mix16B(data[48:], s[96:], seed)
				acc += mix16B(data[n-64:], s[112:], seed)
			}
			acc += mix16B(data[32:], s[64:], seed)
			acc += mix16B(data[n-48:], s[80:], seed)
		}
		acc += mix16B(data[16:], s[32:], seed)
		acc += mix16B(data[n-32:], s[48:], seed)
	}
	acc += mix16B(data, s, seed)
	acc += mix16B(data[n-16:], s[16:], seed)
	return xxh3Avalanche(acc)
}

// len129To240 mixes every 16-byte chunk, with an intermediate avalanche
// after the first 8 rounds, plus the last 16 bytes.
func len129To240(data []byte, seed uint64) uint64 {
	n := len(data)
	s := kSecret[:]
	acc := uint64(n) * prime64_1
	rounds := n / 16
	for i := 0; i < 8; i++ {
		acc += mix16B(data[16*i:], s[16*i:], seed)
	}
	acc = xxh3Avalanche(acc)
	for i := 8; i < rounds; i++ {
		acc += mix16B(data[16*i:], s[16*(i-8)+midSizeStartOffset:], seed)
	}
	acc += mix16B(data[n-16:], s[secretSizeMin-midSizeLastOffset:], seed)
	return xxh3Avalanche(acc)
}

// accumulate512 folds one 64-byte stripe into the accumulators.
func accumulate512(acc *[accNB]uint64, in []byte, s []byte) {
	in = in[:stripeLen]
	s = s[:stripeLen]
	for i := 0; i < accNB; i++ {
		v := readLE64(in[8*i:])
		k := v ^ readLE64(s[8*i:])
		acc[i^1] += v
		acc[i] += (k & 0xFFFFFFFF) * (k >> 32)
	}
}

// scrambleAcc is applied to the accumulators after each full block.
func scrambleAcc(acc *[accNB]uint64, s []byte) {
	s = s[:stripeLen]
	for i := 0; i < accNB; i++ {
		a := acc[i]
		a ^= a >> 47
		a ^= readLE64(s[8*i:])
		a *= prime32_1
		acc[i] = a
	}
}

// hashLong handles inputs longer than 240 bytes: the input is processed in
// blocks of 16 stripes of 64 bytes each, using a secret derived from the seed.
func hashLong(data []byte, seed uint64) uint64 {
	// Derive the custom secret: alternate 8-byte words get +seed / -seed.
	// With seed 0 this is exactly kSecret.
	var secret [secretSize]byte
	for i := 0; i < secretSize/16; i++ {
		binary.LittleEndian.PutUint64(secret[16*i:], readLE64(kSecret[16*i:])+seed)
		binary.LittleEndian.PutUint64(secret[16*i+8:], readLE64(kSecret[16*i+8:])-seed)
	}
	s := secret[:]

	acc := [accNB]uint64{
		prime32_3, prime64_1, prime64_2, prime64_3,
		prime64_4, prime32_2, prime64_5, prime32_1,
	}

	n := len(data)
	blocks := (n - 1) / blockLen
	for b := 0; b < blocks; b++ {
		block := data[b*blockLen:]
		for j := 0; j < stripesPerBlock; j++ {
			accumulate512(&acc, block[j*stripeLen:], s[j*secretConsumeRate:])
		}
		scrambleAcc(&acc, s[secretSize-stripeLen:])
	}

	// Last partial block (no scramble), then the final stripe, which is
	// always the last 64 bytes of input (it may overlap the previous ones).
	tail := data[blocks*blockLen:]
	stripes := ((n - 1) - blocks*blockLen) / stripeLen
	for j := 0; j < stripes; j++ {
		accumulate512(&acc, tail[j*stripeLen:], s[j*secretConsumeRate:])
	}
	accumulate512(&acc, data[n-stripeLen:], s[secretSize-stripeLen-secretLastAccStart:])

	// Merge the 8 accumulators into 64 bits.
	result := uint64(n) * prime64_1
	ms := s[secretMergeStart:]
	for i := 0; i < accNB/2; i++ {
		result += mul128Fold64(acc[2*i]^readLE64(ms[16*i:]), acc[2*i+1]^readLE64(ms[16*i+8:]))
	}
	return xxh3Avalanche(result)
}
