//! Close codes (SPEC §4). 41xx: reconnect with backoff; 45xx: do not until something changes.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    SlowConsumer = 4100,
    Draining = 4101,
    Timeout = 4102,
    Internal = 4103,
    RateLimited = 4104,
    Unauthorized = 4500,
    TokenExpired = 4501,
    Kicked = 4502,
    Replaced = 4503,
    ProtocolError = 4504,
    FrameTooLarge = 4505,
    TooManyConnections = 4507,
}

impl CloseCode {
    /// Every code, in `index` order: the close-code label set is built from it.
    pub const ALL: [CloseCode; 12] = [
        CloseCode::SlowConsumer,
        CloseCode::Draining,
        CloseCode::Timeout,
        CloseCode::Internal,
        CloseCode::RateLimited,
        CloseCode::Unauthorized,
        CloseCode::TokenExpired,
        CloseCode::Kicked,
        CloseCode::Replaced,
        CloseCode::ProtocolError,
        CloseCode::FrameTooLarge,
        CloseCode::TooManyConnections,
    ];

    /// The position in `ALL`. The match is exhaustive, so a new code does not compile until
    /// it has one; the check below then fails until `ALL` lists it there.
    pub const fn index(self) -> usize {
        match self {
            CloseCode::SlowConsumer => 0,
            CloseCode::Draining => 1,
            CloseCode::Timeout => 2,
            CloseCode::Internal => 3,
            CloseCode::RateLimited => 4,
            CloseCode::Unauthorized => 5,
            CloseCode::TokenExpired => 6,
            CloseCode::Kicked => 7,
            CloseCode::Replaced => 8,
            CloseCode::ProtocolError => 9,
            CloseCode::FrameTooLarge => 10,
            CloseCode::TooManyConnections => 11,
        }
    }

    pub fn code(self) -> u16 {
        self as u16
    }

    /// The code as a metrics label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            CloseCode::SlowConsumer => "4100",
            CloseCode::Draining => "4101",
            CloseCode::Timeout => "4102",
            CloseCode::Internal => "4103",
            CloseCode::RateLimited => "4104",
            CloseCode::Unauthorized => "4500",
            CloseCode::TokenExpired => "4501",
            CloseCode::Kicked => "4502",
            CloseCode::Replaced => "4503",
            CloseCode::ProtocolError => "4504",
            CloseCode::FrameTooLarge => "4505",
            CloseCode::TooManyConnections => "4507",
        }
    }

    pub fn from_u16(code: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The default human reason sent in `kick` and the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::Draining => "server draining",
            CloseCode::Timeout => "timeout",
            CloseCode::Internal => "internal error",
            CloseCode::RateLimited => "rate limited",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::TokenExpired => "token expired",
            CloseCode::Kicked => "kicked",
            CloseCode::Replaced => "replaced by a newer login",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::FrameTooLarge => "frame too large",
            CloseCode::TooManyConnections => "too many connections for this user",
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < CloseCode::ALL.len() {
        assert!(
            CloseCode::ALL[i].index() == i,
            "CloseCode::ALL out of order"
        );
        i += 1;
    }
};
