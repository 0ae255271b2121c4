//! Counting MySQL packets in the bytes a connection moves to and from a
//! backend, for `tiproxy_traffic_{inbound,outbound}_packets`: the driver
//! sees raw bytes, split anywhere, so a [`FrameCounter`] follows the frame
//! headers across reads (12 bytes of state per direction, no buffering).

use super::BackendMetrics;

/// One backend leg's traffic as a connection counts it: bytes go straight
/// to the backend's counters, packets once their headers are seen.
#[derive(Debug, Default, Clone, Copy)]
pub struct LegTraffic {
    inbound: FrameCounter,
    outbound: FrameCounter,
}

impl LegTraffic {
    /// A new backend connection whose first `n` bytes out are not MySQL
    /// frames (the PROXY protocol header).
    pub fn after_header(n: usize) -> Self {
        let mut t = Self::default();
        t.outbound.skip = u32::try_from(n).unwrap_or(u32::MAX);
        t
    }

    /// `data` was read from the backend.
    #[inline]
    pub fn read(&mut self, to: &BackendMetrics, data: &[u8]) {
        to.inbound(data.len(), self.inbound.feed(data));
    }

    /// `data` was written to the backend.
    #[inline]
    pub fn written(&mut self, to: &BackendMetrics, data: &[u8]) {
        to.outbound(data.len(), self.outbound.feed(data));
    }
}

/// Follows MySQL frames (3-byte length, sequence id, payload) through a
/// byte stream cut at arbitrary points, counting frame headers.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCounter {
    /// Payload bytes of the current frame still to skip.
    skip: u32,
    /// The length read so far from a header cut by a read.
    len: u32,
    /// Header bytes seen of the next frame (0..4).
    header: u8,
}

impl FrameCounter {
    /// Size of a frame header.
    const HEADER: u8 = 4;

    /// Follows `data`; returns how many frames began in it.
    pub fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut frames = 0;
        while !data.is_empty() {
            if self.skip > 0 {
                let k = (self.skip as usize).min(data.len());
                self.skip -= k as u32;
                data = &data[k..];
                continue;
            }
            // Inside a header: the length's bytes, then the sequence id.
            while self.header < Self::HEADER && !data.is_empty() {
                if self.header < 3 {
                    self.len |= u32::from(data[0]) << (8 * self.header);
                }
                self.header += 1;
                data = &data[1..];
            }
            if self.header == Self::HEADER {
                frames += 1;
                self.skip = self.len;
                self.len = 0;
                self.header = 0;
            }
        }
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::FrameCounter;

    fn frame(len: usize, seq: u8) -> Vec<u8> {
        let mut f = vec![len as u8, (len >> 8) as u8, (len >> 16) as u8, seq];
        f.extend(std::iter::repeat_n(0xab, len));
        f
    }

    #[test]
    fn counts_frames_however_the_stream_is_cut() {
        let mut stream = Vec::new();
        for (i, len) in [0usize, 1, 3, 4, 5, 300, 70_000, 0, 2].iter().enumerate() {
            stream.extend(frame(*len, i as u8));
        }
        for cut in [1usize, 2, 3, 4, 5, 7, 64, 4096, stream.len()] {
            let mut c = FrameCounter::default();
            let n: u64 = stream.chunks(cut).map(|ch| c.feed(ch)).sum();
            assert_eq!(n, 9, "cut every {cut} bytes");
            // Between frames: the next byte starts a header.
            assert_eq!((c.skip, c.header), (0, 0));
        }
    }

    #[test]
    fn a_frame_is_counted_when_its_header_is_complete() {
        let mut c = FrameCounter::default();
        assert_eq!(c.feed(&[10, 0, 0]), 0);
        assert_eq!(c.feed(&[0, 1, 2]), 1);
        assert_eq!(c.feed(&[0; 8]), 0);
        assert_eq!(c.feed(&[0, 0, 0, 1]), 1);
    }
}
