//! Small macros shared by the object modules.

/// A string-valued enum as stored in etcd: serde names, `as_str`, `Display`, `FromStr` with
/// an error listing the accepted values, and `ALL`.
macro_rules! state_enum {
    ($(#[$m:meta])* $name:ident { $($var:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ::serde::Serialize, ::serde::Deserialize)]
        pub enum $name { $(#[serde(rename = $s)] $var),+ }
        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            /// The string stored in etcd.
            pub fn as_str(self) -> &'static str { match self { $($name::$var => $s),+ } }
        }
        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result { f.write_str(self.as_str()) }
        }
        impl ::std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($name::$var),)+
                    _ => Err(format!("{s:?} is not one of {}", [$($s),+].join("|"))),
                }
            }
        }
    };
}
